"""Calls: hits, dose responses, mechanisms of action, plate and campaign QC."""
