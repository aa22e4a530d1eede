"""The gradiend-hf application: the command line (cli), job files (job), the run-folder steps (pipeline) and
report.md (report). It builds on the library; nothing in the library imports it."""
