"""lcq: Parameter Golf submission harness (train -> GPTQ -> LCQ -> artifact gate -> eval -> submit)."""
