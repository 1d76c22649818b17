"""The tools wing: everything around a run that never ships in the single-file script (the `lcq` command, benches,
preflight, submission, datasets, the bundle builder). Tools import the runtime (lcq/), never the reverse; a run reaches
two of them only from the repo, through lcq/from_repo.py."""
