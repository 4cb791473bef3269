"""Starting and running the ranks of a distributed job, given what to run.

- ``worker``: one rank (under torchrun or self-launched): check, join the process group, build the
  distributed generator, run the command's ``run_on_rank``;
- ``spawn``: torchchat's own launcher, which starts tp x pp ranks on this machine and watches them.

It sits between the application layer (``torchchat/builder.py``) and the CLI, and imports nothing of
the CLI: ``cli.main`` hands it the command to run.
"""
