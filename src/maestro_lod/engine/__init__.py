"""What training and deployment both use, so that neither imports the other.

* :mod:`.passes`: the forward pass of the models' contract and the losses;
* :mod:`.reuse`: replaying the modules before the first changed layer (prefix reuse);
* :mod:`.batchnorm`, :mod:`.evaluation`: BatchNorm recalibration and evaluation loops;
* :mod:`.counting`: parameters and MACs of any module; :mod:`.costs`: the deployed form's cost
  per rank (parameters, MACs, measured latency);
* :mod:`.front`, :mod:`.search`: the accuracy–cost front and the greedy rank search behind it.

The package imports no other part of the library above the layers (``training``, ``deploy``,
``runs``, ``commands``).
"""
