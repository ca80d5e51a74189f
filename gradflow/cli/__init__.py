"""The command lines, together: each module maps flags onto a library call and prints the result.

``python -m gradflow <command>`` (see :mod:`gradflow.__main__`) runs ``probe``, ``train``, ``figures``,
``experiment``, ``lesion``, ``paths`` or ``xiong``; ``args`` holds what they share (exit codes,
numeric checks, KEY=VALUE options, the device).
"""
