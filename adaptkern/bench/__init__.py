"""The benchmark harness behind ``adaptkern bench`` and ``adaptkern check`` (and the
pytest-benchmark suites in ``benchmarks/``). Nothing in the library imports it.

* :mod:`.cases`   the shapes (core and mixed suites, CPU smoke shapes), their inputs, flops/bytes;
* :mod:`.impls`   what is timed: the fused op, eager (``adaptkern.ops.adapter_linear.reference``), real peft,
                  torch.compile of eager, F.linear alone;
* :mod:`.check`   the fused op against float64 before any timing (rule: :mod:`adaptkern.testing`);
* :mod:`.timing`  ``triton.testing.do_bench`` on a GPU, ``torch.utils.benchmark`` on a CPU;
* :mod:`.report`  the results file and the printed table; :mod:`.plot` its plot;
* :mod:`.run`     ``adaptkern bench``; :mod:`.env` the device and environment record.

Import the submodule you need; this package imports nothing itself, so ``adaptkern info``
stays light.
"""
