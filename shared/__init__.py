"""Core library of the skill inference service: everything the functions call."""
