"""The Kubernetes provisioner: PVCs of Tandem StorageClasses become replicated Tandem volumes
and bound iSCSI PersistentVolumes, in the style of the OpenEBS (Jiva) provisioner.

kube.py (the API as JSON), informer.py (list + watch caches), workqueue.py, controller.py
(provision, delete, expand), parameters.py / topology.py / pvspec.py (pure: what a claim
asks for, where it may live, the PV), events.py, metrics.py, leader.py (Lease election),
daemon.py and cli.py (`tandem provisioner`).
"""
