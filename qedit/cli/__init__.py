"""The `qedit` command line: `main` parses, builds typed jobs (`args`), calls the pipeline and prints."""
