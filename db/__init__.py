"""SQL store: SQLAlchemy 2.0 models, engines and bulk readers/writers."""
