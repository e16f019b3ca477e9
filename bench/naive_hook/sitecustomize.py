"""The hand-written MoE logger most users start from, kept as the benchmark's reference.

Imported by every Python process that has this folder on PYTHONPATH (vLLM's workers inherit
it). When ``NAIVE_MOE_LOG`` is set it wraps the router of layer ``NAIVE_MOE_LAYER`` with a
host sync (``.cpu().tolist()``) and one ``json.dumps`` + write per token inside the forward
pass. It needs eager mode, knows no request ids, and logs warm-up and profiling batches too.
"""

import os

if os.environ.get("NAIVE_MOE_LOG"):
    import json

    from moeprof.hook.install import _when_imported

    def _patch(module):
        runner_cls = module.MoERunner
        init = runner_cls.__init__
        layer = int(os.environ.get("NAIVE_MOE_LAYER", "0"))

        def __init__(self, *args, **kwargs):
            init(self, *args, **kwargs)
            if self.layer_id != layer:
                return
            compute = self.router._compute_routing
            log = open(os.environ["NAIVE_MOE_LOG"], "a")  # noqa: SIM115

            def logged(*a, **kw):
                weights, ids = compute(*a, **kw)
                for i, (row_ids, row_w) in enumerate(
                    zip(ids.cpu().tolist(), weights.cpu().tolist(), strict=False)
                ):
                    rec = {"token": i, "layer": layer, "topk_ids": row_ids, "topk_weights": row_w}
                    log.write(json.dumps(rec) + "\n")
                log.flush()
                return weights, ids

            self.router._compute_routing = logged

        runner_cls.__init__ = __init__

    _when_imported("vllm.model_executor.layers.fused_moe.runner.moe_runner", _patch)
