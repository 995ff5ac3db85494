"""The API's route modules, one per resource; they share code through api.crud, never each other."""
