"""The build's stages, in the order a build runs them (``pipeline/build.py`` drives them; the README's
"Architecture" section draws the flow):

    load        the user's model (PyTorch module, TorchScript, ONNX, demo) -> a loaded source
    data        calibration and evaluation samples fitted to the model's inputs -> two SampleSets
    compress/   optional pruning, low-rank factorisation, distillation (FP32, gated on its accuracy drop)
    export      the source -> an ExportedModel: one checked, simplified FP32 ONNX file (specialize: fixed shapes)
    reference   the FP32 outputs on the evaluation samples, saved for later device comparisons
    per_target  for each target profile: convert -> validate -> (search) -> choose -> package
      convert     one backend conversion at one precision, cached
      validate    per-output metrics against the reference, a verdict against the budget
      search      the accuracy search: calibration variants, layers kept in float, precision fallbacks
                  (search_state: its tries; mixed_precision: layers in float; islands: a failed graph's island)
      sensitivity per-layer INT8 sensitivity for the search
      objective   which passing candidate ships (latency, size or accuracy)
      package     the target's manifest record; embed: the artifact as a C array for microcontrollers

Stages depend on backends only through ``edgebuild.targets.base`` (the backend contract).
"""
