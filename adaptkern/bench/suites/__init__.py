"""The suites beyond core and mixed, one module each, all with the same interface:

``NAME``, ``KINDS``, ``IMPLS``; ``requirement()`` (None, or why the suite cannot run here);
``cases(quick=, gpu=)``; ``make_inputs(case, device, seed)``; ``build(case, impl, mode, inp,
device)`` (the timed callable, or :class:`~adaptkern.bench.base.Unavailable`);
``check(case, inp, grads)`` (the float64 comparisons); ``work(case, mode)`` (flops, bytes).

* :mod:`.qlora`            LoRA on a bitsandbytes NF4 weight (training and decode)
* :mod:`.dora`             DoRA training steps
* :mod:`.bottleneck_norm`  bottleneck adapters fused with the dense, the residual and the norm
* :mod:`.serving`          multi-slice mixed LoRA (q/k/v) and the serving delta ops
"""
