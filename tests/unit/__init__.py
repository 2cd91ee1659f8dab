"""The fast tier: in-process unit tests, no subprocesses, no sleeping.

A package so that its modules' names (``unit.test_tokens``) do not clash with the
end-to-end modules of the same file name one folder up."""
