"""What a run shows: the HTML report (``html``), its plots (``plots``), the side-by-side reports of an
iteration's rounds and of a sweep (``series``), and the one quantile definition (``stats``)."""
