"""Typed configuration: the dataclasses a run is configured with (``schema``), YAML files and flags into them
(``files``), the flags into a run request (``request``), what a resume may change (``changes``) and the step
plan (``plan``)."""
