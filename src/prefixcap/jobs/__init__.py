"""Caption jobs, the caption loop's drivers that write results: one file (`to_file`), a folder of
parts split over the processes of an `accelerate launch` (or torchrun) job and merged
(`to_folder`, `plan`), and one caption file per image (`sidecar`), in the formats of `writers`."""
