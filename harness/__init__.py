"""segbench: reproduce a Cityscapes semantic-segmentation benchmark table."""

__version__ = "0.1.0"
