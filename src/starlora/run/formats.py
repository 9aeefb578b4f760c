"""The file formats of people's answers (`starlora.run.labels` exports and imports them), named
in a module light enough for the command line to take its ``--format`` choices from without
loading the run layer."""

#: answer file formats: JSON Lines, CSV, a Label Studio tasks JSON / export
FORMATS = ("jsonl", "csv", "label-studio")
