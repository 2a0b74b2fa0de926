"""What both MRML adapters (MRI discs, X-ray corners) need of Slicer's nodes, written once.

Headless like the adapters: only VTK and ``vtkMRML*`` node methods, the nodes are arguments.
``UserEditsWouldBeLost`` is one class so that one ``except`` in the module base catches it for
both modules; ``ijk_to_world`` is where both adapters read a volume's geometry, so a volume
under a linear transform is labeled where Slicer draws it and a non-linear one is refused.
"""

from __future__ import annotations

import numpy as np
import vtk

from VertebralLabelingLib.errors import InputError, VertebralLabelingError


class UserEditsWouldBeLost(VertebralLabelingError):
    """Writing a new prediction would overwrite points the user corrected by hand.

    Raised before the network runs (asking costs nothing); the module widget catches it and asks
    whether to replace the edits or write the result into a new point list.
    """


def matrix_to_numpy(matrix) -> np.ndarray:
    """A ``vtkMatrix4x4`` as a 4x4 numpy array."""
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def ijk_to_world(volume_node) -> np.ndarray:
    """IJK -> world RAS of a volume node (its IJKToRAS times the parent transform, if any).

    Refuses a non-linear parent transform: a matrix cannot represent it, and labeling the
    untransformed voxels would put the points where the user does not see the image.
    """
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    ijk_to_ras = matrix_to_numpy(matrix)
    transform_node = volume_node.GetParentTransformNode()
    if transform_node is None:
        return ijk_to_ras
    if not transform_node.IsTransformToWorldLinear():
        raise InputError(
            f'"{volume_node.GetName()}" is under a non-linear transform; harden the transform '
            "(Data module, right-click > Harden transform) and try again."
        )
    to_world = vtk.vtkMatrix4x4()
    transform_node.GetMatrixTransformToWorld(to_world)
    return matrix_to_numpy(to_world) @ ijk_to_ras
