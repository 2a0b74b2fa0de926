"""VertebralLabelingSlicerLib: the thin layer between the Slicer scene (MRML) and the core."""
