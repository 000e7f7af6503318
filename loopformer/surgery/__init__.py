"""Brain surgery on trained weights (param pytrees; reading and writing runs is the CLI's and the
trainer's glue): paths by name (`naming`), layer duplication made permanent (`duplicate`), a plain model
turned into a looped one (`convert`), and Llama-family weights from a Hugging Face folder (`hf`)."""
