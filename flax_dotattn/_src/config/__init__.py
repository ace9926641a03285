"""Configs: the schemas, their files, and their Keras translations.

* :mod:`.schema`, :mod:`.multi_head_schema`: the frozen dataclasses' fields and checks
  (they know nothing of Keras).
* :mod:`.keras`, :mod:`.multi_head_keras`: the Keras translations, which build on the
  schemas and define the public config classes with their ``from_keras``/``to_keras``.
* :mod:`.files`: reading and writing configs as JSON/YAML files.
"""
