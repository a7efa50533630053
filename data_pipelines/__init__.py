"""Spike deblurring data: raw files -> prepared root -> training batches (see docs/DATA.md).

Modules (import what you need; nothing heavy is imported here, TensorFlow only lazily):
  spike_dat       SpikeCV .dat reader (lazy, memory-mapped frame ranges) and writer
  simulate        integrate-and-fire spike simulator, blur synthesis
  voxelize        closed-window K-bin voxeliser, log1p + train-split statistics
  layout          our dataset layout, dataset.json, alignment log (time base), checked file readers
  converters      Spk-X4K1000FPS / Spk-GoPro layouts -> ours
  prepare         validation, voxel cache, statistics, index (scripts/prepare_data.py)
  synthetic       the embedded dataset (scripts/make_synthetic_dataset.py)
  input_pipeline  default_data_config, create_train_iterator, create_eval_iterator, ensure_embedded_dataset
  tfds_builder    TFDS dataset of a prepared root
  errors          DataError: one line naming the file, the expected and the found value
"""
