"""Reading and writing .mrk.json with Slicer's own storage node, for the MRML round-trip tests."""

import slicer


def json_storage(scene, path):
    storage = slicer.vtkMRMLMarkupsJsonStorageNode()  # not registered by name in a bare scene
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    return storage


def read_with_slicer(path):
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "read")
    assert json_storage(scene, path).ReadData(node) == 1
    return node
