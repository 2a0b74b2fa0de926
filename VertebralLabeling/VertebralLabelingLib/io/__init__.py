"""The data layer every part shares: files (atomic writes, JSON, hashes, the data folder), images,
markups, model files.  It imports nothing of mri, xray, study or cli."""
