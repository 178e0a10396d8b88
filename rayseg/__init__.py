"""rayseg: segment image archives at cluster scale on Ray."""

__version__ = "0.1.0"


def segment(config=None, **kwargs):
    """Run a segment job; takes a SegmentConfig or its fields as keywords, returns the summary dict."""
    from rayseg.segment import segment as _segment

    return _segment(config, **kwargs)


__all__ = ["segment", "__version__"]
