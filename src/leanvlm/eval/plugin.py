"""lmms-eval's entry point (group ``lmms_eval.models``): makes ``--model leanvlm`` resolvable.

Importing this module does not import lmms-eval or torch; lmms-eval imports the class path lazily.
"""


def manifest():
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="leanvlm", simple_class_path="leanvlm.eval.lmms_model.LeanVLMEval")
