"""The training engine: PyTorch only. No web app, no ORM, no Celery; it imports the torch-free `domain`
package for the run spec, catalog, layouts, images, callbacks, results and errors, and runs from the CLI on
CPU with tiny data. Import the submodules you need."""
