"""The stages of `emcid mini train` (:mod:`emcid.mini.train` runs them): the run's settings
(:mod:`.config`), the text side, VAE and judge (:mod:`.stages`), the cached conditioning and
task banks (:mod:`.banks`) and the UNet (:mod:`.unet`)."""
