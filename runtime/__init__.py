"""The runtime: the command line now; compile(), weights and calls as the frontend lands."""
