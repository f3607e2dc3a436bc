"""Captioning at scale: inputs cut into parts (`plan`), split over the processes of an
`accelerate launch` (or torchrun) job, streamed through DataLoader workers (`prefixcap.inputs.loader`),
written as part files and merged (`outputs`, `job`)."""
