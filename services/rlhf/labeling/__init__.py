"""The labeling web page served next to the feedback store (``rlhf serve feedback --labeling-port PORT``)."""
