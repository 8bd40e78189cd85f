"""detnet.controller: config, the asymmetric AIMD policy, the control loop, enforcement
backends (Kubernetes annotations, Linux tc), leader election and the ``detnet`` CLI.
"""
