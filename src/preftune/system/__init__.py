"""What the code runs on: processes (``distributed``), the processor (``hardware``), progress on
stderr (``progress``) and hub ids resolved to local snapshots (``hub``). Nothing here knows about
preference learning."""
