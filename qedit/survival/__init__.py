"""The survival ladder: edits checked at every quantization rung, in the runtime each format runs in.
`ladder` runs it, `build` makes and measures each rung, `measure` holds its data, `rungs` parses the
ladder, `artifacts` caches the quantized files, `metrics` and `report` turn results into JSON, CSV,
Markdown, HTML and a plot."""
