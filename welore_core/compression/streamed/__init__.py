"""WeLore compression streamed from a checkpoint one decoder layer at a time (the layer sources,
writer and memory plan it uses are in layerwise/).

  compress.py    the streamed compression (`compress_streamed`), data-free layer loop
  calibrated.py  its calibrated layer loop (the Calibrator of compression/calibration.py)
  pipeline.py    compress_checkpoint's streamed branch (`compress_spec_streamed`)
"""
