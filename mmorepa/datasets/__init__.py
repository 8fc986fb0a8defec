from .shapes import CLASSES, make_shapes_dataset

__all__ = ['CLASSES', 'make_shapes_dataset']
