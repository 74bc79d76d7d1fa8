"""Views and exports: tables and images for people and other tools."""
