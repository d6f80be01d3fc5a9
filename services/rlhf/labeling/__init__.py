"""Human labeling: the queue of tasks and judgments (:mod:`.queue`, :mod:`.tasks`, :mod:`.judgments`), progress
and agreement (:mod:`.overview`), task sources (:mod:`.sources`), and the web page served next to the feedback
store (``rlhf serve feedback --labeling-port PORT``: :mod:`.app`, :mod:`.views`, :mod:`.auth`, :mod:`.web`;
these need the ``labeling`` extra, ``pip install 'rlhf-platform[labeling]'``, for Flask)."""
