"""Images in: reading fields and plate maps, illumination, field QC, demo plates."""
