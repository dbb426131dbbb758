"""Layer sources: a model streamed one decoder layer at a time, apart from the algorithms (the
streamed compression that drives them is compression/streamed/; nothing here imports compression).

  source.py    a (sharded) safetensors checkpoint read one tensor at a time
  layers.py    where layers come from: in memory (ResidentLayers) or from disk (StreamedLayers)
  hidden.py    token windows run layer by layer (calibration statistics, streamed perplexity)
  writer.py    output shards written as they complete, resumable
  plan.py      the memory plan of a streamed job (estimated peak, spectrum cache bytes)
  evaluate.py  perplexity of a checkpoint streamed layer by layer
"""
