"""What a run shows (the only place that draws).

- ``html``: the report page (``report.html``, one file, plots embedded); ``plots``: its plots;
- ``series``: the side-by-side report of an iteration's rounds; ``sweep``: that of a sweep's values;
- ``runinfo``: what a report says about the run itself (stage, steps, data, precision, processor);
- ``text``: how numbers, intervals and prompts are written, once for every page.

The statistics the pages show are computed in :mod:`preftune.stats`, below every layer.
"""
