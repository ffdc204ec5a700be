"""Measurement of the engine on this machine (`tide bench`): the bandwidth floor, llama.cpp."""
