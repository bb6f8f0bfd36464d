"""The paper's comparisons and ablations, one command each: `moc pipeline <name> --scale <scale>`.

    compare        dense SwiGLU vs MoC, MoC_2:8, ReLU, dReLU, BackRazor, FFN+GCP, MoC+GCP (Tables 2, 12-14)
    placement      MoC's Top-K before vs after SiLU (Table 15)
    k-sweep        perplexity and memory against K (Tables 16, 17)
    batch-scaling  peak memory and tokens/s against batch size, up to out of memory (Table 18)
    profile        per-module activation memory and gate histograms of trained models (Figures 1, 5)

Each invocation is one MLflow parent run with a child run per training job; settings and scales
live in conf/pipeline/<name>.yaml. This package sits on top of `moc_lightning` (it imports the
library, never the reverse; the `moc` command imports it only when a pipeline is asked for).
"""

from pipelines.runner import PipelineOutcome, registry, run_pipeline

__all__ = ["PipelineOutcome", "registry", "run_pipeline"]
