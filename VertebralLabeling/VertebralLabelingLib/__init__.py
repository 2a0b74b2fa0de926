"""VertebralLabelingLib: the Slicer-free core of VertebralLabeling.

Everything here runs with numpy, SimpleITK and TensorFlow only, so the same code serves the
Slicer panel, the ``vertebral-labeling`` command line and batch studies.  It must never import
``slicer``, ``qt``, ``ctk`` or MRML classes (a test checks this).
"""

__version__ = "0.1.0"

#: SCT / spine-generic disc label values handled by the MRI pipeline, cranial to caudal.
DISC_VALUES = (3, 4, 5, 6, 7, 8)
#: Human-readable names of the discs, same order as DISC_VALUES (fixed fiducial labels).
DISC_NAMES = ("C2-C3", "C3-C4", "C4-C5", "C5-C6", "C6-C7", "C7-T1")
DISC_NAME_BY_VALUE = dict(zip(DISC_VALUES, DISC_NAMES))
