"""An example NordFL plugin: importing it registers FedNova (an algorithm), a residual MLP (a
model) and label shards (a partitioner); ``conf/`` beside it holds their YAML options."""

from nordfl_fednova import algorithm, model, partition  # noqa: F401  (importing registers them)
