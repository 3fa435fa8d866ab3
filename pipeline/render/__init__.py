"""Everything a person looks at, drawn from stored results: layer sheets, unit cards,
per-image sheets, the book, the HTML site, the stages' own figures and the Deep
Visualization Toolbox files.

Nothing here loads a model. The report's modules (report, sheets, image_sheet, cards,
book, site, results, canvas, draw) read results.h5 with h5py and never import
TensorFlow; `maps` re-reads images through the dataset stream when a sheet needs the
pixels the model saw.
"""
