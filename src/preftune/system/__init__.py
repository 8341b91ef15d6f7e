"""What the code runs on, and the files it writes. Nothing here knows about preference learning.

- ``distributed``: processes (the few collective steps data-parallel training needs);
- ``hardware``: the processor and what it has (bf16 units, a C++ compiler for inductor);
- ``progress``: progress on stderr, transformers' bars quiet;
- ``hub``: hub ids resolved to local snapshots;
- ``files``: the one atomic write and the one file digest;
- ``runfolder``: a run folder claimed for one run, and its ``status.json``;
- ``seeding``: every random number generator seeded once, when a run starts.
"""
