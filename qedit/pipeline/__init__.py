"""The pipeline: every rule that decides what qedit writes, called by the CLI, the Python API and survival.

    job = EditJob("model.gguf", load_requests("facts.jsonl"), MethodChoice("memit"),
                  Output("out.gguf", quant="Q4_K_M"))
    run = run_edit(job)          # plan -> model to compute on -> compute -> write -> llama.cpp check
"""
