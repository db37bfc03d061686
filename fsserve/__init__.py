"""fsserve: train, export and serve prompt-based few-shot text classifiers (LM-BFF), fast.

Public names are imported lazily (PEP 562) so that ``import fsserve`` stays light: the
onnxruntime prediction path never imports torch. The package's folders are the stages in the life
of a model (the README's "Layout" says what each may import):

    config, data, sampling,     settings, tasks and loaders, k-shot splits and stratified samples,
    metrics                     task metrics
    prompts/                    templates, label words, encoding with the answer position
    demos/                      the demonstration pool (SBERT → FAISS) and how demonstrations enter a prompt
    embedded, heads, modeling   the LM with its label-word head (PromptModel)
    training, methods/          the Trainer; probing, prompt/prefix tuning, LoRA
    search/                     automatic label words and templates, prompt ensembles
    bundle                      the on-disk bundle (torch-free reader)
    runtime/, predictor         backends (onnxruntime, torch) and the Predictor on top of them
    serving/                    KServe v2 server, dynamic batcher, client
    experiment/, bench/         the LM-BFF protocol; latency benchmarks
    cli/                        the ``fsserve`` command (nothing in the library imports it)

>>> from fsserve import PromptModel, Predictor  # doctest: +SKIP
"""

from __future__ import annotations

from fsserve import _moved
from fsserve.utils.lazy import lazy_exports

__version__ = "0.1.0"

_LAZY = {
    "PromptConfig": "fsserve.config",
    "TrainingArguments": "fsserve.config",
    "Template": "fsserve.prompts",
    "Prompt": "fsserve.prompts",
    "Example": "fsserve.data",
    "get_task": "fsserve.data",
    "load_kshot": "fsserve.data",
    "load_examples": "fsserve.data",
    "PromptModel": "fsserve.modeling",
    "Trainer": "fsserve.training",
    "Predictor": "fsserve.predictor",
}

__all__ = sorted(_LAZY) + ["__version__"]
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
_moved.install()  # old module paths (fsserve.ensemble, fsserve.cli_serve, ...) keep working for one release
