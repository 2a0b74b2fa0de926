"""AP spine X-ray: radiographs, the AASCE data, the corner network, labeling, Cobb angles, export,
evaluation and training."""
