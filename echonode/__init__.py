"""echonode: a DICOM node that runs the EchoCLIP echocardiography model in the PACS workflow."""

__version__ = "0.1.0"
